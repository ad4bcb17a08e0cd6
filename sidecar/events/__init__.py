"""Events: one typed object per kind (:mod:`.model`), two encodings of it (:mod:`.codec`)."""
