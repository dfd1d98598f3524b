"""Searching binary codes: the Hamming index and its methods, exact search, streamed encoding, the API and the page."""
