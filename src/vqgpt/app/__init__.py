"""`vqgpt app`: the web app (`vqgpt.export.hub.app_vqgpt`) over vqgpt's own pipeline."""
