"""The search engine over a persistent index, the service (input checks, authorisation) and the HTTP app."""
