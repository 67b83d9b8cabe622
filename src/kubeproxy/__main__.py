"""``python -m kubeproxy`` runs the kube-proxy command line."""

import sys

from kubeproxy.cli import main

sys.exit(main())
