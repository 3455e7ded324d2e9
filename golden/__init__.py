"""swat-min's porting kit: reference tensors for every stage (see golden/README.md)."""
