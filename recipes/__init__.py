"""The shipped recipe YAML files, installed as package data (`augment_gan.recipe_files`); the code is `augment_gan.recipes`."""
