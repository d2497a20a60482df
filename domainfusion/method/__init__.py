"""The DomainFusion method (method.md): latent distillation and online lightweight augmentation."""
