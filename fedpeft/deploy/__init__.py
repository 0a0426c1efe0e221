"""Deployment on real nodes: credentials for TLS and SuperNode authentication."""
