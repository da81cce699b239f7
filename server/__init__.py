"""The pFedMMA ServerApp: averages only the shared projections."""
