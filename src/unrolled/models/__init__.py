"""Ready networks: the cells, the four flavors, encoder-decoders."""
