"""``tessera demo``: a node, a stand-in PACS and phantom studies, end to end."""
