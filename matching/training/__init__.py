"""Trainers: they take a :class:`~matching.search.Snapshot` of a bundle and return new parts (a reranker, a query
encoder, a student checkpoint); the :class:`~matching.Matcher` facade publishes them. Nothing here runs at query
time, and nothing on the query path imports it."""
