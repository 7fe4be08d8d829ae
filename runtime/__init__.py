"""The runtime: server -> engine -> worker -> backends; reads builds through compiler/manifest.py."""
