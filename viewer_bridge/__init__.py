"""viewer_bridge."""
