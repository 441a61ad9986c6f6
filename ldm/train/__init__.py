"""Training: EMA, atomic resumable training state, and the recipes this project trains its shipped models with."""
