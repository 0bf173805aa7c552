"""Importers: a foreign model layout mapped onto the existing stage configs and checkpoint bundles."""
