"""Example processors that ship in the byoc image (importable as ``examples.<module>:<Class>``)."""
