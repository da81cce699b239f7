"""The pFedMMA ClientApp: private adapters and local data stay here."""
