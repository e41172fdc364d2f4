"""What is installed where, and the files made for it at build time (man pages, the conffile)."""
