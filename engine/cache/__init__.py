"""Which experts sit in the fast device's cache: bookkeeping (shared by engine and simulator), policies, profiles."""
