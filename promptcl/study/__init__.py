"""Ray Tune + Train studies, MLflow tracking and the trade-off map."""
