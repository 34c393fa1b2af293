"""`python -m nebula.testengine`: see the package's doc."""

from nebula.testengine import main

main()
