"""Code generated from protos/premoe/v1/premoe.proto by `make proto`; do not edit."""
