"""Search spaces shipped with an-search (YAML data files; see ``an_search.search.space``)."""
