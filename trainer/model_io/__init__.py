"""A trained backbone in and out: `load` rebuilds it from model.pt, `export` writes it as ONNX and
TorchScript (`python -m trainer.model_io.export`), `flops` counts its parameters and multiply-adds."""
