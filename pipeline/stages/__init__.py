"""One module per DVC stage or command: read params, call the core, write files and MLflow."""
