"""Drop-in front ends for code written against other pools (see each module)."""
