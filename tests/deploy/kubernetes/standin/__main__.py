"""`python -m tests.deploy.kubernetes.standin`: start the Kubernetes stand-in, print its
kubeconfig, run until Ctrl-C (for debugging)."""
from .harness import main

main()
