"""A model and a conversation with it: loader (folders, checks, memory estimate), catalog, session, sampling."""
