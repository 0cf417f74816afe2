"""Terminal front-ends (typer + rich) over the ``an_search`` library."""
