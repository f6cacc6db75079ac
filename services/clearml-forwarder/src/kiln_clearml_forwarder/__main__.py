"""Run the forwarder: python -m kiln_clearml_forwarder."""
from .main import main

main()
