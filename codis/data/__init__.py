"""What reads and writes data: webdataset shards (:mod:`.shards`), loaders (:mod:`.loaders`),
img2dataset downloads (:mod:`.download`) and the generated demo world (:mod:`.demo_world`).
Imports only the model core."""
