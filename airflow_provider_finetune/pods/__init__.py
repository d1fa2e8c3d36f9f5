"""Pure builders: engine job spec -> Pod / Deployment / Service / TrainJob / PyTorchJob manifests."""
