"""``python -m clip_continual.sweep``: several methods over several seeds, one Kedro session
(one MLflow run) each; ``runtime/sweep.py`` holds the command."""

from clip_continual.runtime.sweep import main

if __name__ == "__main__":
    main()
