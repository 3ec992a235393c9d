"""The torch side: attention capture on the Wan architecture, model sources and prompt encoders."""
