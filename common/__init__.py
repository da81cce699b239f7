"""Code shared by the pFedMMA ServerApp and ClientApp: model, adapters, roles, data, config."""
