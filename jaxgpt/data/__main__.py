"""``python -m jaxgpt.data inspect ...``"""

import sys

from jaxgpt.data.inspect import main

sys.exit(main())
