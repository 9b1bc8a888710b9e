"""dispatcher: send SMS through many providers reliably and fast."""
