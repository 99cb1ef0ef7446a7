"""PNG previews (``evforge preview``): :mod:`.streams` renders a stream file (event frames of a few windows and
the event rate; ``event_frame`` draws any event array), :mod:`.shards` a grid of samples of a built dataset.
They read files and datasets and write PNGs only, so they sit above the readers and the builders."""
