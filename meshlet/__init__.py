"""meshlet: a service mesh with a service-mesh-specific micro-proxy."""

__version__ = "0.1.0"
