"""A user's own clips: decoding (PyAV), feature extractors (openSMILE audio, OpenCV faces + EfficientNet-Lite0
frames), their settings, and ``mmsenti features extract`` (a folder or list of clips → a ``features`` dataset)."""
