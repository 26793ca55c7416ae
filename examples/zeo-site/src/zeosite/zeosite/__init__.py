"""The deploy-agent example ZEO site: buildout recipes and a tiny WSGI app."""
