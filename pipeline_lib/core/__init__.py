"""The core every phase uses: config, workspace and its catalog, stage cache keys, MLflow tracking, devices."""
