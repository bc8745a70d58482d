"""Benchmark harness for meshlet: compares the meshlet proxy with Envoy and HAProxy.

Run with ``python -m bench --help``; the method is described in bench/README.md.
"""
