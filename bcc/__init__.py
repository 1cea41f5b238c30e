"""bcc: a distributed trainer for medical image classification, blood-cell cancer first."""

__version__ = "0.1.0"
