"""`numavm check`: what Linux should make of our tables, what the guest reported, the
comparison and the verdict."""
