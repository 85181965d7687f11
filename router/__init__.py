"""Expert registry, routing by reconstruction error, and mounting of new experts."""
