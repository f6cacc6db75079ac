"""Kiln's built-in Ultralytics YOLO trainer: ``python -m kiln_trainer_ultralytics`` (or ``kiln-train-ultralytics``)."""
