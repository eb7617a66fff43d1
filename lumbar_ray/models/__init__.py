"""The models and what runs them per image: the YOLOv8 detector (build, preprocessing, inference), DeepScoreNet (network, loss, crops), the model registry."""
