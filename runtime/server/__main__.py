"""`python -m pllm.runtime.server BUILD_DIR`: the same as `pllm-serve`."""

import sys

from pllm.runtime.server.cli import main

sys.exit(main())
