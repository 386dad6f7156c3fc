"""Built-in job kinds. Importing a module here registers its kinds; nothing else happens."""
