"""Array-API-only math: objectives, aggregation, diagnostics. Imports no framework."""
