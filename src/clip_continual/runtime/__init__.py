"""The runtime around the science: parameter checks, MLflow tracking and which runs are results,
run keys, benchmark definitions, and the methods-by-seeds sweep."""
