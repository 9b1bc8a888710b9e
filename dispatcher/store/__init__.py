"""The store: the truth about every message. Tables, engines, and the queries that move state."""
